"""Relevance data: the record type, builders for real sets, the synthetic world, pipelines."""

from jaxgrm.data.schema import SCALES, STEP_NAMES, GradeScale, RelevanceExample

__all__ = ["SCALES", "STEP_NAMES", "GradeScale", "RelevanceExample"]
