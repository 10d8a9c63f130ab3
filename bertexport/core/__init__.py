"""Foundations every stage shares: errors and exit codes, the cache and staging folders, typed options, the task and family records, text readers, the manifest. No model code."""
