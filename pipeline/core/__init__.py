"""Config, the content-addressed stage runner and cache, logging, progress: no model code."""
