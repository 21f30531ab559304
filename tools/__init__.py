"""Maintenance scripts: test-bed training, head statistics and previews, kernel resource reports."""
