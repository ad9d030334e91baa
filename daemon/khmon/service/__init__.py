"""What `khmon daemon` needs around the pipeline: the socket API and its client, sd_notify,
and the journal-friendly log."""
