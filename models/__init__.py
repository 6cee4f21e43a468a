"""The shipped base model (`vqr1-small-cold-start/`) and the pipeline that builds it (`base_model.py`)."""
