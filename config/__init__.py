"""Configuration: the settings object, logging setup and the beat schedule. No logic lives here."""
