"""The gRPC gateway: what storefronts call (`vitrine gateway run`)."""
