"""Frozen teachers, multi-teacher soft-target fusion and the soft-target cache."""
from graftkd.teachers.cache import SoftTargetCache, cache_manifest
from graftkd.teachers.ensemble import Teacher, TeacherEnsemble, load_teachers, measure_val_accuracy
from graftkd.teachers.fusion import fuse, weights
from graftkd.teachers.targets import TeacherTargets, build_teacher_targets, teachers_report

__all__ = [
    "SoftTargetCache",
    "Teacher",
    "TeacherEnsemble",
    "TeacherTargets",
    "build_teacher_targets",
    "cache_manifest",
    "fuse",
    "load_teachers",
    "measure_val_accuracy",
    "teachers_report",
    "weights",
]
