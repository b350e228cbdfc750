"""Data: rows -> canonical records -> template segments -> tokens and labels -> batches."""
