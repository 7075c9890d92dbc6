"""Bronze layer of a lakehouse: raw files to validated Parquet and Delta tables."""
