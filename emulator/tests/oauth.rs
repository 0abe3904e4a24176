//! OAuth flow, token lifecycle and bearer authentication.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hubspot_emulator::EmulatorConfig;
use reqwest::StatusCode;
use serde_json::json;

const ID: &str = "emulator-client-id";
const SECRET: &str = "emulator-client-secret";

#[tokio::test]
async fn authorize_redirects_with_encoded_code_and_state() {
    let emu = start().await;
    let c = client();
    let resp = c
        .get(format!("{}/oauth/authorize", emu.base_url()))
        .query(&[
            ("client_id", ID),
            ("redirect_uri", "http://localhost:9187/cb?spot=42"),
            ("scope", "oauth timeline"),
            ("state", "a b&c=d"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    let loc = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(
        loc.starts_with("http://localhost:9187/cb?spot=42&code="),
        "{loc}"
    );
    let url = reqwest::Url::parse(&loc).unwrap();
    let q: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    assert!(q.contains(&("spot".into(), "42".into())));
    assert!(q.contains(&("state".into(), "a b&c=d".into())));
    assert!(q.iter().any(|(k, v)| k == "code" && !v.is_empty()));

    // Account-specific authorize URL and a bad client id.
    let (portal, _) = emu.create_portal();
    let r = c
        .get(format!("{}/oauth/{portal}/authorize", emu.base_url()))
        .query(&[
            ("client_id", ID),
            ("redirect_uri", REDIRECT),
            ("scope", "oauth"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    let r = c
        .get(format!("{}/oauth/authorize", emu.base_url()))
        .query(&[
            ("client_id", "nope"),
            ("redirect_uri", REDIRECT),
            ("scope", "oauth"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn code_exchange_metadata_and_introspection() {
    let emu = start().await;
    let c = client();
    let code = authorize(&emu, &c, ALL_SCOPES).await;
    let form = [
        ("grant_type", "authorization_code"),
        ("client_id", ID),
        ("client_secret", SECRET),
        ("redirect_uri", REDIRECT),
        ("code", code.as_str()),
    ];
    // Wrong secret first: invalid_client, code not consumed.
    let mut bad = form;
    bad[2] = ("client_secret", "wrong");
    let (s, v) = token(&emu, &c, &bad).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["status"], "BAD_CLIENT_SECRET");
    assert!(
        v.get("error").is_none(),
        "HubSpot's own style names no error: {v}"
    );

    let (s, v) = token(&emu, &c, &form).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["token_type"], "bearer");
    assert_eq!(v["expires_in"], 1800);
    let hub = v["hub_id"].as_u64().unwrap();
    assert!(hub >= 1000);
    assert!(v["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s == "timeline"));
    let access = v["access_token"].as_str().unwrap().to_string();
    let refresh = v["refresh_token"].as_str().unwrap().to_string();

    // Single use.
    let (s, v) = token(&emu, &c, &form).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["status"], "EXPIRED_AUTH_CODE");

    let (s, v) = split(
        c.get(format!(
            "{}/oauth/v1/access-tokens/{access}",
            emu.base_url()
        ))
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["hub_id"], hub);
    assert_eq!(v["app_id"], 4242);
    assert_eq!(v["token_type"], "access");
    assert!(v["expires_in"].as_i64().unwrap() > 1700);

    let (s, v) = split(
        c.get(format!(
            "{}/oauth/v1/refresh-tokens/{refresh}",
            emu.base_url()
        ))
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["hub_id"], hub);

    for (path, tok) in [
        ("/oauth/v3/token/introspect", access.as_str()),
        ("/oauth/2026-03/token/introspect", refresh.as_str()),
    ] {
        let (s, v) = split(
            c.post(format!("{}{path}", emu.base_url()))
                .form(&[("client_id", ID), ("client_secret", SECRET), ("token", tok)])
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["active"], true, "{v}");
        assert_eq!(v["hub_id"], hub);
    }
    let (_, v) = split(
        c.post(format!("{}/oauth/v3/token/introspect", emu.base_url()))
            .form(&[
                ("client_id", ID),
                ("client_secret", SECRET),
                ("token", "unknown"),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["active"], false);

    // The access token works on the API, under the date-versioned token path too.
    let (s, _) = get(&emu, &c, &access, "/crm/v3/properties/contacts/groups").await;
    assert_eq!(s, StatusCode::OK);
    let stats = emu.request_stats(hub);
    assert_eq!(stats.count("oauth.token", 200), 1);
    assert_eq!(stats.count("oauth.token", 400), 1);
}

#[tokio::test]
async fn refresh_tokens_rotate() {
    let emu = start_with(EmulatorConfig {
        rotate_refresh_tokens: true,
        ..Default::default()
    })
    .await;
    let c = client();
    let t = connect(&emu, &c).await;
    let refresh = |rt: String| {
        let emu = &emu;
        let c = &c;
        async move {
            let r = c
                .post(format!("{}/oauth/2026-03/token", emu.base_url()))
                .form(&[
                    ("grant_type", "refresh_token"),
                    ("client_id", ID),
                    ("client_secret", SECRET),
                    ("refresh_token", rt.as_str()),
                ])
                .send()
                .await
                .unwrap();
            split(r).await
        }
    };
    let (s, v) = refresh(t.refresh.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["hub_id"], t.portal);
    let new_refresh = v["refresh_token"].as_str().unwrap().to_string();
    let new_access = v["access_token"].as_str().unwrap().to_string();
    assert_ne!(new_refresh, t.refresh);
    assert_ne!(new_access, t.access);

    let (s, v) = refresh(t.refresh.clone()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["status"], "BAD_REFRESH_TOKEN");

    let (s, _) = get(&emu, &c, &new_access, "/crm/v3/properties/contacts").await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = refresh(new_refresh).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn refusals_come_in_each_style_and_hub_id_can_be_absent() {
    use hubspot_emulator::OAuthErrorStyle;
    for (style, error) in [
        (OAuthErrorStyle::StatusOnly, None),
        (OAuthErrorStyle::InvalidRequest, Some("invalid_request")),
        (OAuthErrorStyle::OAuth2, Some("invalid_grant")),
    ] {
        let emu = start_with(EmulatorConfig {
            oauth_error_style: style,
            omit_hub_id: true,
            ..Default::default()
        })
        .await;
        let c = client();
        let t = connect(&emu, &c).await;
        let (s, v) = token(
            &emu,
            &c,
            &[
                ("grant_type", "refresh_token"),
                ("client_id", ID),
                ("client_secret", SECRET),
                ("refresh_token", "na1-unknown"),
            ],
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(v["status"], "BAD_REFRESH_TOKEN", "{v}");
        assert_eq!(v.get("error").and_then(|e| e.as_str()), error, "{v}");
        let (s, v) = token(
            &emu,
            &c,
            &[
                ("grant_type", "refresh_token"),
                ("client_id", ID),
                ("client_secret", SECRET),
                ("refresh_token", &t.refresh),
            ],
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert!(v.get("hub_id").is_none(), "{v}");
        assert_eq!(v["token_use"], "access_token");
    }
}

#[tokio::test]
async fn without_rotation_the_refresh_token_stays_valid() {
    let emu = start_with(EmulatorConfig {
        rotate_refresh_tokens: false,
        ..Default::default()
    })
    .await;
    let c = client();
    let t = connect(&emu, &c).await;
    for _ in 0..2 {
        let r = c
            .post(format!("{}/oauth/2026-03/token", emu.base_url()))
            .form(&[
                ("grant_type", "refresh_token"),
                ("client_id", ID),
                ("client_secret", SECRET),
                ("refresh_token", t.refresh.as_str()),
            ])
            .send()
            .await
            .unwrap();
        let (s, v) = split(r).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(
            v["refresh_token"],
            t.refresh.as_str(),
            "the same refresh token"
        );
        assert_ne!(v["access_token"], t.access.as_str(), "a new access token");
    }
}

#[tokio::test]
async fn refresh_token_revocation() {
    let emu = start().await;
    let c = client();
    let t = connect(&emu, &c).await;
    let r = c
        .delete(format!(
            "{}/oauth/v1/refresh-tokens/{}",
            emu.base_url(),
            t.refresh
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (s, v) = token(
        &emu,
        &c,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", ID),
            ("client_secret", SECRET),
            ("refresh_token", &t.refresh),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["status"], "BAD_REFRESH_TOKEN");

    let t2 = connect(&emu, &c).await;
    let r = c
        .post(format!("{}/oauth/2026-03/token/revoke", emu.base_url()))
        .form(&[
            ("client_id", ID),
            ("client_secret", SECRET),
            ("token", t2.refresh.as_str()),
            ("token_type_hint", "refresh_token"),
        ])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let (s, _) = token(
        &emu,
        &c,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", ID),
            ("client_secret", SECRET),
            ("refresh_token", &t2.refresh),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Access tokens stay valid until expiry (documented for the v1 DELETE).
    let (s, _) = get(&emu, &c, &t2.access, "/crm/v3/properties/contacts").await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn bearer_errors_and_correlation_ids() {
    let emu = start().await;
    let c = client();
    let r = c
        .get(format!("{}/crm/v3/properties/contacts", emu.base_url()))
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("x-hubspot-correlation-id"));
    let (s, v) = split(r).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["category"], "INVALID_AUTHENTICATION");
    assert!(v["message"]
        .as_str()
        .unwrap()
        .starts_with("Authentication credentials not found."));
    assert!(v["correlationId"].is_string());
    let (s, v) = get(&emu, &c, "made-up", "/crm/v3/properties/contacts").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["category"], "INVALID_AUTHENTICATION");
}

#[tokio::test]
async fn expired_access_tokens_answer_expired_authentication() {
    let emu = start().await;
    let c = client();
    let t = connect(&emu, &c).await;
    emu.expire_access_tokens(t.portal);
    let (s, v) = get(&emu, &c, &t.access, "/crm/v3/properties/contacts").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["category"], "EXPIRED_AUTHENTICATION");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.starts_with("The OAuth token used to make this call expired ")
            && msg.ends_with(" second(s) ago."),
        "{msg}"
    );
    assert_eq!(emu.request_stats(t.portal).count("properties.list", 401), 1);
    // Refreshing gives a working token.
    let (s, v) = token(
        &emu,
        &c,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", ID),
            ("client_secret", SECRET),
            ("refresh_token", &t.refresh),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = get(
        &emu,
        &c,
        v["access_token"].as_str().unwrap(),
        "/crm/v3/properties/contacts",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn short_token_ttl_expires_by_itself() {
    let emu = start_with(EmulatorConfig {
        token_ttl: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let c = client();
    let t = connect(&emu, &c).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (s, v) = get(&emu, &c, &t.access, "/crm/v3/properties/contacts").await;
        if s == StatusCode::UNAUTHORIZED {
            assert_eq!(v["category"], "EXPIRED_AUTHENTICATION");
            break;
        }
        assert_eq!(s, StatusCode::OK);
        assert!(Instant::now() < deadline, "token never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn revoked_portal_gets_401_and_can_reinstall() {
    let emu = start().await;
    let c = client();
    let t = connect(&emu, &c).await;
    let (portal, key) = emu.create_portal();
    emu.revoke_portal(t.portal);
    emu.revoke_portal(portal);
    for tok in [&t.access, &key] {
        let (s, v) = get(&emu, &c, tok, "/crm/v3/properties/contacts").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(v["category"], "INVALID_AUTHENTICATION");
    }
    let (s, v) = token(
        &emu,
        &c,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", ID),
            ("client_secret", SECRET),
            ("refresh_token", &t.refresh),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["status"], "BAD_REFRESH_TOKEN");
    // Reinstall on the same portal.
    emu.set_next_grant_portal(Some(t.portal));
    let t2 = connect(&emu, &c).await;
    assert_eq!(t2.portal, t.portal);
    let (s, _) = get(&emu, &c, &t2.access, "/crm/v3/properties/contacts").await;
    assert_eq!(s, StatusCode::OK);
    // Back to a new portal per grant.
    emu.set_next_grant_portal(None);
    let t3 = connect(&emu, &c).await;
    assert_ne!(t3.portal, t.portal);
    let _ = json!({});
}

#[tokio::test]
async fn service_key_learns_its_portal_from_account_info() {
    let emu = start().await;
    let c = client();
    let (portal, key) = emu.create_portal();
    assert!(key.starts_with("pat-na1-"));
    let (s, v) = get(&emu, &c, &key, "/account-info/v3/details").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["portalId"], portal);
}
