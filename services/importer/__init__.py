"""`crm import`: a retailer's history (customers, purchases, refunds, points balances and other
events) from CSV, JSON Lines or Parquet exports into `crm.events`, once, completely and exactly
(docs/import.md).

    mapping.py   the mapping file (TOML): which file holds what, in which columns and formats
    values.py    one cell to one typed value, or the reason it cannot be read
    readers.py   the rows of a CSV, JSON Lines or Parquet file, and the original bytes of a row
    build.py     rows to catalog events, one kind of file at a time; each row an event or a reject
    plan.py      every file of a mapping to one sorted, validated stream of events and the rejects
    progress.py  how far a previous run got: the acknowledged prefix of the stream
    send.py      the stream to Kafka (and the rejects to the dead-letter topic), resumable
    report.py    the rejected rows as CSV, and the summary a person reads
    run.py       all of it, as `crm import` runs it
    sample.py    a synthetic retailer export with its mapping and expected figures (tests, benchmark)
"""
