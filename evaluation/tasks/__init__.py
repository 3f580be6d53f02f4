"""The datasets: their files on disk (format, reading, checks), the word-level tasks, RULER's tasks and its prose."""
