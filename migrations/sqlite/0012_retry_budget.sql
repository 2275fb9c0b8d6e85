-- Retries by hand keep attempt numbers growing: a job's attempt is named by (id, attempt)
-- everywhere (the settle guard, lease renewal, the dispatcher), so a retry keeps `attempt`
-- and raises `max_attempts` by the budget the job was submitted with, kept here on its first
-- retry (NULL: never retried, `max_attempts` is still that budget).
ALTER TABLE jobs ADD COLUMN attempt_budget INTEGER CHECK (attempt_budget >= 1);
