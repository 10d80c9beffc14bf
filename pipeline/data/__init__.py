"""The data path: dataset sources, view parameters and their executors (torch reference, DALI), and the
loaders that turn an epoch plan into batches."""
