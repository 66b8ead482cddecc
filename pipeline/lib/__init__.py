"""Libraries the steps share: archives, records, input pipeline, models, reports, MLflow."""
