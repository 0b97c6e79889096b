"""SQLAlchemy models, one module per aggregate. Import from here."""

from portal.models.audit import AuditEvent, AuditHead
from portal.models.auth import AccountToken, RecoveryCode, WebSession
from portal.models.keys import DataKey
from portal.models.messages import Attachment, Message, PickupLink
from portal.models.notifications import Notification
from portal.models.notifier import NotifierWorker
from portal.models.teams import CareTeam, CareTeamMember, Conversation, ConversationRead
from portal.models.users import ApiClient, Consent, PatientProfile, Role, User

__all__ = [
    "AccountToken",
    "ApiClient",
    "Attachment",
    "AuditEvent",
    "AuditHead",
    "CareTeam",
    "CareTeamMember",
    "Consent",
    "Conversation",
    "ConversationRead",
    "DataKey",
    "Message",
    "Notification",
    "NotifierWorker",
    "PatientProfile",
    "PickupLink",
    "RecoveryCode",
    "Role",
    "User",
    "WebSession",
]
