"""Networks: each maps (x_t, t or noise level) to a prediction of x's shape."""
