"""`rtprune-ocr convert`: a corpus of PDFs and images to markdown, resumable, with progress.

- :mod:`.sources` finds the documents (files, folders, globs) and names their outputs;
- :mod:`.workspace` keeps the output folder: each finished page on disk at once, a manifest of
  documents and their options, the documents' ``.md`` and ``.json``, the report;
- :mod:`.local` runs the pages in this process through the service's own scheduler (continuous
  batching across documents); :mod:`.remote` sends documents as jobs to running services;
- :mod:`.command` ties them together for the CLI.
"""
