"""Report: fit's results as report.json, report.md, figures and the self-contained report.html page."""
