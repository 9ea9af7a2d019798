"""Who runs next and who counts the slots: queue, policy, capacity ledger."""
