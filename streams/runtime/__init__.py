"""The worker's runtime around the pure fold: the Faust app and its agent (app.py), the state
store with its changelog (state_store.py), its Prometheus metrics (metrics.py), and the one adapter
that touches Faust's and aiokafka's private parts (faust_adapter.py). Nothing here decides anything
about a customer."""
