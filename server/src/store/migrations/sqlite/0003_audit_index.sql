-- Audit retention deletes by age: find old rows without a full scan.
CREATE INDEX audit_log_at_ms ON audit_log (at_ms);
