"""Reports of finished studies: the data a page shows (:mod:`~emtune.report.data`), its Markdown
(:mod:`~emtune.report.markdown`) and figures (:mod:`~emtune.report.figures`), and the writer
that puts them in place (:mod:`~emtune.report.writer`)."""

from emtune.report.data import (NotStarted, ReportError, StudyData, TrialRecord, fmt_value, load_study_data,
                                shown_path)
from emtune.report.writer import write_report

__all__ = ["NotStarted", "ReportError", "StudyData", "TrialRecord", "fmt_value", "load_study_data", "shown_path", "write_report"]
