"""Event data for training: a columnar table, a synthetic storefront, a MovieLens loader, and sequences."""
