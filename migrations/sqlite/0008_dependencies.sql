-- Jobs that depend on jobs, and retries by hand.
--
-- A new status, `waiting` (for its parents). SQLite cannot alter a CHECK constraint, and
-- rebuilding the jobs table would have to name every column and index that any migration
-- added; widening the allowed set is the one schema change SQLite documents as safe to make
-- by editing the table's stored definition (https://sqlite.org/lang_altertable.html, "making
-- other kinds of table schema changes": existing rows already satisfy a wider CHECK). The
-- edit replaces only the status list of the status column's CHECK; RESET reloads the schema.
PRAGMA writable_schema = ON;
UPDATE sqlite_schema
   SET sql = replace(sql,
       'status IN (''queued'', ''running'', ''succeeded'', ''failed'', ''cancelled'')',
       'status IN (''waiting'', ''queued'', ''running'', ''succeeded'', ''failed'', ''cancelled'')')
 WHERE type = 'table' AND name = 'jobs';
PRAGMA writable_schema = RESET;

-- The parents a job waits for, as a JSON array of ids (NULL: none), as the job lists them.
ALTER TABLE jobs ADD COLUMN depends_on TEXT;
-- Whether it runs once its parents are final even if one failed or was cancelled.
ALTER TABLE jobs ADD COLUMN run_on_parent_failure INTEGER NOT NULL DEFAULT 0
    CHECK (run_on_parent_failure IN (0, 1));
-- How many times it was retried by hand (POST /v1/jobs/{id}/retry).
ALTER TABLE jobs ADD COLUMN retried INTEGER NOT NULL DEFAULT 0 CHECK (retried >= 0);

-- The edges, for finding a parent's children when it finishes (and a child's parents). A
-- parent may be deleted (pruned) before its child: no foreign key on parent_id.
CREATE TABLE job_deps (
    parent_id TEXT NOT NULL,
    child_id  TEXT NOT NULL,
    PRIMARY KEY (parent_id, child_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX job_deps_child ON job_deps (child_id);
CREATE TRIGGER jobs_forget_deps AFTER DELETE ON jobs BEGIN
    DELETE FROM job_deps WHERE child_id = OLD.id;
END;
