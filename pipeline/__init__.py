"""The library that the stages compute with: data sources, recipes, views, models, losses, training."""
