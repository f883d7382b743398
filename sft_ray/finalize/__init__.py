"""Phase 2: from the run folder's rollouts to training shards and the report (calls no model)."""
