"""Storage and data model: Arrow schemas, dataset readers/writers, mask encoding, configuration."""
