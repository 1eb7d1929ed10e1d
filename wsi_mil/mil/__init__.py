"""Multiple instance learning on feature bags: models, training methods, cross-validation, metrics."""
