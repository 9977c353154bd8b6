"""Alert emails: conditions with hold-downs, reminders, digests and a persistent outbox."""
