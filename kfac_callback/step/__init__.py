"""The phases of one K-FAC step, each a function of explicit inputs that ``KFACCallback.step()``
calls in order: factors (``factors.py``), inverses and preconditioning (``precondition.py``),
the weight gradients skip_weight_grad leaves to the step (``skip_weight_grad.py``), and the
grad scaler's loss scale (``loss_scale.py``)."""
