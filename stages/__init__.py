"""One module per stage; each exposes a thin ``run(...)`` that reads inputs, calls ``pipeline`` and writes outputs."""
