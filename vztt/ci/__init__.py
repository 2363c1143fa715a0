"""The nightly as CI files: one description (jobs.py), rendered for GitHub
Actions (github.py) and GitLab CI (gitlab.py); `python -m vztt.ci` (`make
ci`) writes both into the checkout."""
