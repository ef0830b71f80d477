"""ClickHouse projections: each table's DDL beside the code that turns Kafka records into its rows,
the versioned migrations that create them, and the writer process that owns the database."""
