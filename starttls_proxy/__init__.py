"""starttls-proxy: a STARTTLS terminator with one isolated TLS process per connection."""
