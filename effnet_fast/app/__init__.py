"""The application: the `effnet-fast` command line (`python -m effnet_fast ...`) and what
its commands need (data sets, the training loop, the checkpoint format, timing helpers).
Built on the model library; nothing in the library imports it."""
