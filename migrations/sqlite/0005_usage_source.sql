-- Issue 14: where an interception's token counts come from ('reported' by the provider,
-- 'estimated' by Tollgate when the response ended without a usage report, 'none' when nothing
-- reached a model).
ALTER TABLE interceptions ADD COLUMN usage_source TEXT NOT NULL DEFAULT 'reported';
