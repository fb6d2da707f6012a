"""Where runs are kept: MLflow tracking (in this process or a second one) and local run directories."""
