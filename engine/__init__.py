"""The mixed-precision training engine.

Read `precision.py`, `loss_scale.py`, `step.py` and `loop.py`, in that order.
"""
