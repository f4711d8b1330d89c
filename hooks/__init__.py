"""Hook modules, installed as ``diglett.hooks``; they see only diglett.signals payloads."""
