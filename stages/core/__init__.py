"""What every layer uses: the user-facing error, logging, progress lines, the device choice,
typed setting values and the name registries of models and losses."""
