"""The studies: the toy-model and real-model studies, their shared core, reports and plots, diagnoses."""
