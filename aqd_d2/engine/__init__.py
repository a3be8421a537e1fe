"""(registrations are imported here)"""
