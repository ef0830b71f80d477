"""Stream processing: pure folds over the ordered event log (profile.py, pipeline.py) and the thin
Faust adapter that runs them against Kafka (app.py)."""
