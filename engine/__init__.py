"""The mixed-precision training engine. Start reading at `train_step.py`."""
