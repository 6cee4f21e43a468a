"""One-off analyses of training runs and the base model; not part of the installed package."""
