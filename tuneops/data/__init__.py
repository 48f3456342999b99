"""Data: bundled datasets, record parsing and the validation gate."""
