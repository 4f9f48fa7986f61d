"""Sign-in of the clinician app (Streamlit widgets over :mod:`pipeline.ui.auth`).

Local users sign in with a form checked against the user file (a pause after each failure, the name
locked after ``ui.max_failed_logins`` failures); OIDC users through ``st.login`` (their role still
comes from the user file). The signed-in :class:`~pipeline.ui.auth.UiUser` lives in the session and is
checked against the user file on every run, so a removed user is signed out at their next click.
"""

from __future__ import annotations

import math
import time

import streamlit as st

from pipeline.config import Settings
from pipeline.errors import UiAuthError
from pipeline.ui.auth import AuthPlan, LoginThrottle, UiUser, UserStore, resolve_auth, user_id_for

SESSION_KEY = "ui_user"


@st.cache_resource
def _throttle(max_failures: int, lockout_s: float) -> LoginThrottle:
    """One throttle per app process (shared by every browser session)."""
    return LoginThrottle(max_failures, lockout_s)


def auth_plan(settings: Settings) -> AuthPlan | None:
    """How this app signs people in (the bind address as Streamlit was started with it); None = refused."""
    try:
        return resolve_auth(settings, st.get_option("server.address"))
    except UiAuthError as exc:
        st.error(f"The clinician app cannot start: {exc}" + (f" ({exc.hint})" if exc.hint else ""))
        return None


def signed_in_user(settings: Settings, plan: AuthPlan) -> UiUser | None:
    """The signed-in user, or None after rendering the sign-in (the page stops there)."""
    if plan.mode == "none":
        return UiUser("local user (no sign-in)", "clinician", None)
    if plan.mode == "oidc":
        return _oidc_user(settings, plan)
    user = st.session_state.get(SESSION_KEY)
    if user is not None:
        role = UserStore(settings.ui_users_file).role_of(user.name)
        if role is not None:
            if role != user.role:
                user = st.session_state[SESSION_KEY] = UiUser(user.name, role, user.user_id)
            return user
        st.session_state.pop(SESSION_KEY, None)  # removed from the user file since signing in
    _local_form(settings)
    return None


def _local_form(settings: Settings) -> None:
    st.subheader("Sign in")
    with st.form("sign_in", clear_on_submit=True):
        name = st.text_input("User name", key="login_name")
        password = st.text_input("Password", type="password", key="login_password")
        submitted = st.form_submit_button("Sign in")
    if not submitted:
        return
    name = name.strip()
    throttle = _throttle(settings.ui.max_failed_logins, settings.ui.lockout_s)
    wait = throttle.locked_for(name)
    if wait > 0:
        st.error(f"Too many failed sign-ins for this user name: try again in {math.ceil(wait)} s.")
        return
    role = UserStore(settings.ui_users_file).authenticate(name, password)
    if role is None:
        throttle.failed(name)
        time.sleep(settings.ui.failed_login_delay_s)
        st.error("Unknown user name or wrong password.")
        return
    throttle.succeeded(name)
    st.session_state[SESSION_KEY] = UiUser(name, role, user_id_for(settings, name))
    st.rerun()


def _oidc_user(settings: Settings, plan: AuthPlan) -> UiUser | None:
    if not st.user.is_logged_in:
        st.subheader("Sign in")
        if st.button("Sign in with your organisation's account"):
            st.login(plan.provider) if plan.provider else st.login()
        return None
    email = str(st.user.get("email") or "")
    role = UserStore(settings.ui_users_file).role_of(email, casefold=True)
    if role is None:
        st.error("Your account is not authorised for the clinician app: ask an administrator to add it "
                 "(`xrayops ui users add EMAIL --oidc --role clinician`).")
        st.button("Sign out", on_click=st.logout)
        return None
    return UiUser(email, role, user_id_for(settings, email))


def sign_out_button(plan: AuthPlan, user: UiUser) -> None:
    st.sidebar.write(f"Signed in as **{user.name}** ({user.role})")
    if plan.mode == "oidc":
        st.sidebar.button("Sign out", on_click=st.logout)
    elif plan.mode == "local" and st.sidebar.button("Sign out", key="sign_out"):
        st.session_state.clear()
        st.rerun()
