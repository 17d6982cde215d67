"""Build reports: report.json (schema: docs/report.schema.json), junit.xml and a self-contained report.html."""

from edgepack.report.summary import build_report, write_reports

__all__ = ["build_report", "write_reports"]
