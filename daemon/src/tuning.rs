//! Host tuning checks (filled in by the operations work).
