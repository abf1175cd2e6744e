"""Image archives: list items (:mod:`.sources`), embed them into a Parquet store (:mod:`.embed`, :mod:`.store`)
and search the store with text (:mod:`.search`)."""
