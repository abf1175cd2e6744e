"""Image archives: items (:mod:`.items`: kinds, tile settings, read errors) are read by :mod:`.readers` (remote
rasters over HTTP and S3 by :mod:`.remote`, their URLs in :mod:`.hrefs`) and listed
by :mod:`.sources` (with :mod:`.webdataset` and :mod:`.geotiff`); :mod:`.job` embeds them into a Parquet store
(:mod:`.store`) shard by shard with :mod:`.embedder`, locally or on Ray (:mod:`.ray_executor`); :mod:`.search`
scores the store against text or image queries, optionally through a FAISS index (:mod:`.index`), and
:mod:`.render` writes the hits out (table, JSON, GeoJSON, HTML)."""
