//! The operator's console in a real browser (headless Chromium driven over WebDriver by
//! `fantoccini`) against a running `livemount serve`: sign in (a wrong token refused, then the
//! right one), mount a snapshot from the page and find its attach instructions, read the disk
//! over NFS with libnfs and see the counters move, relocate it and watch the progress bar reach
//! the end, finish, mount again and unmount through the confirmation, forget a boot profile.
//! Each step leaves a screenshot at 1280x800 and the page at 390x844, screen by screen, in
//! `target/console-screens/`.
//!
//! And without a browser: the session cookie and its CSRF checks. A change from another origin,
//! without the cookie, without the CSRF header, or with a session that ended is refused and
//! changes nothing; the bearer token works as before.

mod common;

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

const SIZE: u64 = 48 << 20;
const WIDE: (u32, u32) = (1280, 800);
const PHONE: (u32, u32) = (390, 844);
/// Phone screenshots per step, at most.
const PHONE_PAGES: u64 = 6;

/// A server over a repository holding KVM VM `vm` (one 48 MiB mixed disk, `disk.img`), whose
/// relocations may write under `t/primary`; the disk's bytes.
fn setup(t: &Path) -> (Server, Vec<u8>) {
    let disk = mixed_disk(SIZE, 11);
    write(&t.join("disk.img"), &disk);
    let cfg = kvm_config(t, "vm", &[("disk.img", "raw")]);
    let repo = repo_with_backup(t, &cfg);
    let config = relocate_config(t, &[&t.join("primary")], "");
    let server = Server::start(
        &repo,
        &t.join("state"),
        "off",
        &["--config", config.to_str().unwrap()],
    );
    (server, disk)
}

fn api_url(server: &Server) -> String {
    let api: serde_json::Value =
        serde_json::from_slice(&std::fs::read(server.state.join("api.json")).unwrap()).unwrap();
    api["url"].as_str().unwrap().to_string()
}

fn token(server: &Server) -> String {
    std::fs::read_to_string(server.state.join("api-token"))
        .unwrap()
        .trim()
        .to_string()
}

/// A boot profile for VM `vm` (its first eight blocks), imported as `profile import` does.
fn import_profile(server: &Server, t: &Path) {
    let blocks: Vec<_> = (0..8)
        .map(|b| {
            json!({"disk": "disk.img", "block": b, "chunk": "00".repeat(32),
                   "score": 1.0, "first_ms": b * 10})
        })
        .collect();
    let p = json!({"format": 1, "vm": "vm", "chunk_size": 1 << 20, "boots": 1,
                   "updated": "2026-12-01T10:00:00Z", "blocks": blocks});
    let path = t.join("vm-profile.json");
    write(&path, p.to_string().as_bytes());
    server.cli(&["profile", "import", path.to_str().unwrap()]);
}

// ---- the browser -----------------------------------------------------------------------------

/// `chromedriver` on a free loopback port, in a process group of its own that the browsers it
/// starts join; on drop the group is killed (by the driver's PID), so that a test that fails
/// before it closes its session leaves no browser behind.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_driver() -> Driver {
    for tool in ["chromium", "chromedriver"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "{tool} is required for the console's browser test: scripts/install-deps installs \
             it (Debian chromium and chromium-driver)"
        );
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("chromedriver")
        .args([&format!("--port={port}"), "--allowed-ips=127.0.0.1"])
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting chromedriver (scripts/install-deps installs chromium-driver)");
    let mut driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = driver.child.try_wait() {
            panic!("chromedriver exited ({status})");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "chromedriver did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    driver
}

async fn browser(driver: &Driver) -> Client {
    let mut args = vec![
        "--headless=new".to_string(),
        "--disable-gpu".into(),
        "--disable-dev-shm-usage".into(),
        "--hide-scrollbars".into(),
        "--disable-crash-reporter".into(),
        format!("--window-size={},{}", WIDE.0, WIDE.1),
    ];
    // Chromium's sandbox cannot run as root (CI runs as root).
    if rustix::process::geteuid().is_root() {
        args.push("--no-sandbox".into());
    }
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a Chromium session through chromedriver")
}

/// Where the screenshots go.
fn screens() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("console-screens");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Sets the viewport (the window's inner size) to `w` x `h`.
async fn viewport(c: &Client, w: u32, h: u32) {
    c.set_window_size(w, h).await.unwrap();
    let inner = c
        .execute("return [window.innerWidth, window.innerHeight];", vec![])
        .await
        .unwrap();
    let (iw, ih) = (inner[0].as_u64().unwrap(), inner[1].as_u64().unwrap());
    // Headless windows have no frame, but be sure: grow the window by what it lacks.
    if (iw, ih) != (u64::from(w), u64::from(h)) {
        c.set_window_size(w + (w - iw as u32), h + (h - ih as u32))
            .await
            .unwrap();
    }
}

/// Screenshots of the page as it is: the wide viewport, and the phone's screen scrolled down
/// page by page (at most [`PHONE_PAGES`]).
async fn shot(c: &Client, name: &str) {
    let dir = screens();
    viewport(c, WIDE.0, WIDE.1).await;
    c.execute("window.scrollTo(0, 0);", vec![]).await.unwrap();
    std::fs::write(
        dir.join(format!("{name}-1280.png")),
        c.screenshot().await.unwrap(),
    )
    .unwrap();
    viewport(c, PHONE.0, PHONE.1).await;
    let size = c
        .execute(
            "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight];",
            vec![],
        )
        .await
        .unwrap();
    let (wide, high) = (size[0].as_u64().unwrap(), size[1].as_u64().unwrap());
    // Nothing may be wider than the phone's screen.
    assert!(
        wide <= u64::from(PHONE.0),
        "at step {name} the page is {wide} px wide on a {} px phone",
        PHONE.0
    );
    let pages = high.div_ceil(u64::from(PHONE.1)).min(PHONE_PAGES);
    for page in 0..pages {
        c.execute(
            "window.scrollTo(0, arguments[0]);",
            vec![json!(page * u64::from(PHONE.1))],
        )
        .await
        .unwrap();
        std::fs::write(
            dir.join(format!("{name}-390-{page}.png")),
            c.screenshot().await.unwrap(),
        )
        .unwrap();
    }
    c.execute("window.scrollTo(0, 0);", vec![]).await.unwrap();
    viewport(c, WIDE.0, WIDE.1).await;
}

/// Waits until the script `js` (a function body) returns true; panics with `what` and the
/// page's message after `secs`.
async fn wait_js(c: &Client, js: &str, what: &str, secs: u64) {
    let t0 = Instant::now();
    loop {
        let v = c.execute(js, vec![]).await.unwrap();
        if v.as_bool() == Some(true) {
            return;
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            let msg = text(c, "#message").await;
            panic!("waited {secs} s for {what}; the page says: {msg:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn text(c: &Client, css: &str) -> String {
    c.execute(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
        vec![json!(css)],
    )
    .await
    .unwrap()
    .as_str()
    .unwrap_or("")
    .to_string()
}

async fn set(c: &Client, css: &str, value: &str) {
    let e = c.find(Locator::Css(css)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(value).await.unwrap();
}

/// Clicks the element `css`, scrolled to the middle of the screen first (as a user would
/// see it: not under the sticky message).
async fn click(c: &Client, css: &str) {
    c.execute(
        "document.querySelector(arguments[0]).scrollIntoView({block: 'center'});",
        vec![json!(css)],
    )
    .await
    .unwrap();
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Clicks the button whose text is `label` inside `scope`.
async fn click_button(c: &Client, scope: &str, label: &str) {
    let found = c
        .execute(
            "for (const b of document.querySelectorAll(arguments[0] + ' button')) { \
               if (b.textContent.trim() === arguments[1] && !b.hidden) { b.scrollIntoView({block: 'center'}); return true; } } \
             return false;",
            vec![json!(scope), json!(label)],
        )
        .await
        .unwrap();
    assert_eq!(found, json!(true), "no button {label:?} in {scope}");
    let xpath = format!("//button[normalize-space(.)='{label}']");
    for b in c.find_all(Locator::XPath(&xpath)).await.unwrap() {
        if b.is_displayed().await.unwrap() {
            b.click().await.unwrap();
            return;
        }
    }
    panic!("button {label:?} is not displayed");
}

/// From the top of the page, Tab alone reaches sign-out, a snapshot's Mount button, the boot
/// profile's Forget button and every field of the mount form, each with a visible focus ring.
async fn keyboard_reaches_every_control(c: &Client) {
    use fantoccini::actions::{InputSource, KeyAction, KeyActions};
    c.execute(
        "document.activeElement.blur(); window.scrollTo(0, 0);",
        vec![],
    )
    .await
    .unwrap();
    let mut reached = Vec::new();
    for _ in 0..40 {
        let tab = KeyActions::new("keyboard".into())
            .then(KeyAction::Down { value: '\u{e004}' })
            .then(KeyAction::Up { value: '\u{e004}' });
        c.perform_actions(tab).await.unwrap();
        let d = c
            .execute(
                "const e = document.activeElement; \
                 if (!e || e === document.body) return ['(page)', 'n/a']; \
                 return [e.id || e.getAttribute('aria-label') || e.textContent.trim(), \
                         getComputedStyle(e).outlineStyle];",
                vec![],
            )
            .await
            .unwrap();
        let name = d[0].as_str().unwrap_or("").to_string();
        assert_ne!(d[1], "none", "{name} has no visible focus");
        reached.push(name);
    }
    for want in [
        "sign-out",
        "Forget the boot profile of vm",
        "Mount vm@",
        "mount-snapshot",
        "mount-name",
        "mount-network",
        "mount-prestage",
        "mount-hosts",
        "mount-ro",
        "Mount",
    ] {
        assert!(
            reached.iter().any(|r| r.starts_with(want)),
            "Tab never reaches {want}: {reached:?}"
        );
    }
    c.execute("document.activeElement.blur();", vec![])
        .await
        .unwrap();
}

#[test]
fn the_console_signs_in_mounts_reads_relocates_and_unmounts_in_a_real_browser() {
    let t = tempfile::tempdir().unwrap();
    let (server, disk) = setup(t.path());
    import_profile(&server, t.path());
    let url = api_url(&server);
    let token = token(&server);
    let driver = start_driver();
    let dest = t.path().join("primary/vm");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = browser(&driver).await;
        viewport(&c, WIDE.0, WIDE.1).await;
        c.goto(&format!("{url}/")).await.unwrap();

        // A wrong token is refused, with the API's message.
        wait_js(&c, "return !document.getElementById('signin').hidden;", "the sign-in form", 10).await;
        set(&c, "#token", "not-the-token").await;
        click(&c, "#signin-form button").await;
        wait_js(
            &c,
            "return document.getElementById('signin-error').textContent.includes('wrong API token');",
            "the wrong token's refusal",
            10,
        )
        .await;
        shot(&c, "01-wrong-token").await;

        // The right one: the snapshots by VM, with the VM's boot profile.
        set(&c, "#token", &token).await;
        click(&c, "#signin-form button").await;
        wait_js(&c, "return !document.getElementById('app').hidden && !!document.querySelector('[data-vm=\"vm\"] tbody tr');", "the signed-in page with the VM's snapshot", 15).await;
        let vm = text(&c, "[data-vm=\"vm\"]").await;
        assert!(vm.contains("boot profile: 1 boot, 8 blocks"), "{vm}");
        shot(&c, "02-signed-in").await;
        keyboard_reaches_every_control(&c).await;

        // Mount from the page: the snapshot's Mount button fills the form.
        click_button(&c, "[data-vm=\"vm\"]", "Mount…").await;
        set(&c, "#mount-name", "vm-lm1").await;
        set(&c, "#mount-hosts", "127.0.0.1").await;
        click_button(&c, "#mount-form", "Mount").await;
        wait_js(&c, "return !!document.querySelector('[data-mount=\"vm-lm1\"]');", "the new mount listed", 20).await;
        let msg = text(&c, "#message").await;
        assert!(msg.contains("Mounted vm@") && msg.contains("as vm-lm1"), "{msg}");
        let card = text(&c, "[data-mount=\"vm-lm1\"]").await;
        for want in ["read-write", "127.0.0.1/32", "disconnect", "disk.img"] {
            assert!(card.contains(want), "{want} not in the card: {card}");
        }
        click(&c, "[data-mount=\"vm-lm1\"] summary").await;
        let attach = text(&c, "[data-mount=\"vm-lm1\"] details").await;
        for want in ["esxcli storage nfs add", "vim-cmd solo/registervm", "virsh define vm-lm1.xml", "/vm-lm1/disk.img"] {
            assert!(attach.contains(want), "{want} not in the attach instructions: {attach}");
        }
        // The copy button copies (or says to select and copy where the browser will not).
        click(&c, "[data-mount=\"vm-lm1\"] .attach button.copy").await;
        wait_js(
            &c,
            "return document.querySelector('[data-mount=\"vm-lm1\"] .attach button.copy').textContent === 'Copied';",
            "the copy button to say Copied",
            5,
        )
        .await;
        // Pre-staging ran from the imported profile.
        wait_js(&c, "return document.querySelector('[data-mount=\"vm-lm1\"]').textContent.includes('Pre-staging');", "pre-staging shown", 10).await;
        shot(&c, "03-mounted").await;

        // Read the whole disk over NFS with libnfs, while the page watches the counters.
        let before = text(&c, "#cache").await;
        let nfs_url = server.libnfs_url("vm-lm1/disk.img");
        let reader = std::thread::spawn(move || client("nfs-cat", &[&nfs_url]));
        wait_js(
            &c,
            // The chart's highest point, not its last: a quick read may be over by the time
            // the page polls.
            "const g = document.querySelector('#chart figure svg'); \
             const m = g && /highest ([0-9.]+) MB\\/s/.exec(g.getAttribute('aria-label')); \
             return !!m && parseFloat(m[1]) > 0;",
            "the read throughput on the chart",
            30,
        )
        .await;
        shot(&c, "04-reading").await;
        let out = reader.join().unwrap();
        assert!(out.status.success(), "nfs-cat: {}", output_text(&out));
        assert!(out.stdout == disk, "the disk read over NFS differs from the backed-up one");
        wait_js(
            &c,
            "return /Hit ratio[^]*\\d+ misses/.test(document.getElementById('cache').textContent) && \
                    !document.getElementById('cache').textContent.includes('(0 hits, 0 misses)');",
            "the cache counters",
            10,
        )
        .await;
        let after = text(&c, "#cache").await;
        assert_ne!(before, after, "the cache counters did not move");

        // Relocate at 8 MB/s (48 MiB: about six seconds) and watch the bar reach its end.
        c.find(Locator::Css("#relocate-mount")).await.unwrap().select_by_value("vm-lm1").await.unwrap();
        set(&c, "#relocate-to", dest.to_str().unwrap()).await;
        set(&c, "#relocate-rate", "8").await;
        click_button(&c, "#relocate-form", "Start relocation").await;
        wait_js(&c, "return !!document.querySelector('[data-relocation=\"vm-lm1\"] progress');", "the relocation's progress bar", 15).await;
        let seen = c
            .execute(
                "const p = document.querySelector('[data-relocation=\"vm-lm1\"] progress'); return [p.value, p.max];",
                vec![],
            )
            .await
            .unwrap();
        shot(&c, "05-relocating").await;
        // docs/img/console.png: a mount and a relocation under way, at 1280x800 (taken once
        // the copy has moved; if it was quicker than the page's polls, at its end).
        let t0 = Instant::now();
        loop {
            let state = c
                .execute(
                    "const p = document.querySelector('[data-relocation=\"vm-lm1\"] progress'); \
                     return p.value > 0 ? (p.value < p.max ? 'moving' : 'end') : 'start';",
                    vec![],
                )
                .await
                .unwrap();
            if state != json!("start") || t0.elapsed() > Duration::from_secs(60) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c.execute("window.scrollTo(0, 0);", vec![]).await.unwrap();
        std::fs::write(screens().join("readme-console.png"), c.screenshot().await.unwrap()).unwrap();
        wait_js(
            &c,
            "const p = document.querySelector('[data-relocation=\"vm-lm1\"] progress'); \
             return !!p && p.value === p.max && \
                    document.querySelector('[data-relocation=\"vm-lm1\"] .phase').textContent.startsWith('synced');",
            "the copy to reach its end (synced)",
            60,
        )
        .await;
        assert!(
            seen[0].as_f64().unwrap() < seen[1].as_f64().unwrap(),
            "the bar was full from the start: {seen}"
        );
        let relocation = text(&c, "[data-relocation=\"vm-lm1\"]").await;
        assert!(relocation.contains("synced · 100 %"), "{relocation}");
        shot(&c, "06-synced").await;

        // Finish: the copy takes over, the mount is retired, the relocation says done.
        click_button(&c, "[data-mount=\"vm-lm1\"]", "Finish relocation").await;
        wait_js(
            &c,
            "const p = document.querySelector('[data-relocation=\"vm-lm1\"] .phase'); \
             return !!p && p.textContent.startsWith('done') && !document.querySelector('[data-mount=\"vm-lm1\"]');",
            "the relocation done and its mount retired",
            60,
        )
        .await;
        assert!(dest.join("disk.img").exists());
        shot(&c, "07-finished").await;

        // Mount again, then unmount through the confirmation, which says what is lost.
        set(&c, "#mount-snapshot", "vm").await;
        set(&c, "#mount-name", "vm-lm2").await;
        click_button(&c, "#mount-form", "Mount").await;
        wait_js(&c, "return !!document.querySelector('[data-mount=\"vm-lm2\"]');", "the second mount", 20).await;
        click_button(&c, "[data-mount=\"vm-lm2\"]", "Unmount…").await;
        wait_js(&c, "return document.getElementById('confirm').open;", "the confirmation", 5).await;
        let warning = text(&c, "#confirm").await;
        assert!(warning.contains("discarded and cannot be recovered"), "{warning}");
        shot(&c, "08-confirm-unmount").await;
        // Declining changes nothing.
        click(&c, "#confirm-cancel").await;
        wait_js(&c, "return document.getElementById('message').textContent.includes('vm-lm2 stays mounted');", "the declined unmount", 5).await;
        assert!(server.cli(&["mounts"]).contains("vm-lm2"));
        click_button(&c, "[data-mount=\"vm-lm2\"]", "Unmount…").await;
        click(&c, "#confirm-ok").await;
        wait_js(&c, "return !document.querySelector('[data-mount=\"vm-lm2\"]') && document.getElementById('message').textContent.includes('vm-lm2 unmounted');", "the mount gone", 20).await;
        assert!(!server.cli(&["mounts"]).contains("vm-lm2"));

        // Forget the boot profile.
        click_button(&c, "[data-vm=\"vm\"]", "Forget boot profile").await;
        wait_js(&c, "return document.querySelector('[data-vm=\"vm\"] .profile').textContent === 'no boot profile';", "the profile forgotten", 15).await;
        assert!(server.cli(&["profile", "list"]).contains("no boot profiles"));
        // A refusal shows the API's own message: mounting a snapshot that is not there.
        set(&c, "#mount-snapshot", "no-such-vm").await;
        click_button(&c, "#mount-form", "Mount").await;
        wait_js(&c, "return document.getElementById('message').className === 'error';", "the refusal", 10).await;
        let refusal = text(&c, "#message").await;
        assert!(refusal.contains("no-such-vm"), "{refusal}");
        shot(&c, "09-refused").await;
        click(&c, "#message-close").await;
        wait_js(&c, "return document.getElementById('message').hidden;", "the message dismissed", 5).await;

        // Sign out: the page asks for the token again, and the old session opens nothing.
        click(&c, "#sign-out").await;
        wait_js(&c, "return !document.getElementById('signin').hidden;", "the sign-in form again", 10).await;
        c.refresh().await.unwrap();
        wait_js(&c, "return !document.getElementById('signin').hidden;", "signed out after a reload", 10).await;
        c.close().await.unwrap();
    });
    // The token never reached the log.
    assert!(
        !server.log_text().contains(&token),
        "the token is in the log"
    );
}

// ---- the session's checks, without a browser ------------------------------------------------

struct Http {
    base: String,
    agent: ureq::Agent,
}

/// A reply's status, `Set-Cookie` and body.
struct Reply {
    status: u16,
    cookie: Option<String>,
    body: serde_json::Value,
}

impl Http {
    fn new(base: &str) -> Http {
        Http {
            base: base.to_string(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into(),
        }
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Reply {
        let url = format!("{}{path}", self.base);
        let r = match method {
            "GET" => {
                let mut b = self.agent.get(&url);
                for (k, v) in headers {
                    b = b.header(*k, *v);
                }
                b.call()
            }
            "DELETE" => {
                let mut b = self.agent.delete(&url);
                for (k, v) in headers {
                    b = b.header(*k, *v);
                }
                b.call()
            }
            _ => {
                let mut b = self
                    .agent
                    .post(&url)
                    .header("content-type", "application/json");
                for (k, v) in headers {
                    b = b.header(*k, *v);
                }
                b.send(body.map(|b| b.to_string()).unwrap_or_default())
            }
        };
        let mut r = r.unwrap();
        let cookie = r
            .headers()
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().to_string());
        let text = r.body_mut().read_to_string().unwrap();
        Reply {
            status: r.status().as_u16(),
            cookie,
            body: serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        }
    }
}

#[test]
fn changes_need_the_session_its_csrf_value_and_the_servers_own_origin() {
    let t = tempfile::tempdir().unwrap();
    let (server, _) = setup(t.path());
    import_profile(&server, t.path());
    let base = api_url(&server);
    let own = base.clone();
    let token = token(&server);
    let h = Http::new(&base);
    let bearer = format!("Bearer {token}");
    let mounts = || -> usize {
        h.call("GET", "/v1/mounts", &[("authorization", &bearer)], None)
            .body
            .as_array()
            .unwrap()
            .len()
    };
    let mount = json!({"snapshot": "vm", "name": "vm-x"});

    // The page itself needs no token, and locks itself down.
    let page = h.agent.get(format!("{base}/")).call().unwrap();
    assert_eq!(page.status(), 200);
    let csp = page
        .headers()
        .get("content-security-policy")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );

    // A wrong token: 401 with the API's message, and no cookie.
    let r = h.call(
        "POST",
        "/v1/session",
        &[("origin", &own)],
        Some(&json!({"token": "nope"})),
    );
    assert_eq!(r.status, 401);
    assert!(
        r.body["error"]
            .as_str()
            .unwrap()
            .contains("wrong API token"),
        "{}",
        r.body
    );
    assert!(r.cookie.is_none());
    // Signing in from another origin is refused too, even with the right token.
    let r = h.call(
        "POST",
        "/v1/session",
        &[("origin", "http://evil.example")],
        Some(&json!({"token": token})),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.cookie.is_none());

    // The right one: a cookie holding a session id (not the token), HttpOnly, SameSite=Strict.
    let r = h.call(
        "POST",
        "/v1/session",
        &[("origin", &own)],
        Some(&json!({"token": token})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let set_cookie = r.cookie.unwrap();
    for want in [
        "livemount_session=",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
    ] {
        assert!(set_cookie.contains(want), "{set_cookie}");
    }
    assert!(!set_cookie.contains(&token), "the cookie holds the token");
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let csrf = r.body["csrf"].as_str().unwrap().to_string();
    assert_ne!(csrf, token);
    // Reading needs only the cookie.
    let r = h.call("GET", "/v1/snapshots", &[("cookie", &cookie)], None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["vms"][0]["vm"], "vm");
    assert_eq!(r.body["vms"][0]["profile"]["blocks"], 8);
    assert_eq!(
        h.call("GET", "/v1/session", &[("cookie", &cookie)], None)
            .body["csrf"],
        csrf.as_str()
    );

    // Refused, and nothing changes: from another origin; without the CSRF header; with a
    // wrong one; from another site by Sec-Fetch-Site; without the cookie.
    type Headers<'a> = Vec<(&'a str, &'a str)>;
    let refused: Vec<(&str, Headers, u16)> = vec![
        (
            "another origin",
            vec![
                ("cookie", &cookie),
                ("x-livemount-csrf", &csrf),
                ("origin", "http://evil.example"),
            ],
            403,
        ),
        (
            "another port",
            vec![
                ("cookie", &cookie),
                ("x-livemount-csrf", &csrf),
                ("origin", "http://127.0.0.1:1"),
            ],
            403,
        ),
        (
            "no CSRF header",
            vec![("cookie", &cookie), ("origin", &own)],
            403,
        ),
        (
            "a wrong CSRF value",
            vec![
                ("cookie", &cookie),
                ("x-livemount-csrf", "0000"),
                ("origin", &own),
            ],
            403,
        ),
        (
            "another site",
            vec![
                ("cookie", &cookie),
                ("x-livemount-csrf", &csrf),
                ("sec-fetch-site", "cross-site"),
            ],
            403,
        ),
        (
            "no cookie",
            vec![("x-livemount-csrf", &csrf), ("origin", &own)],
            401,
        ),
        (
            "a made-up session",
            vec![
                ("cookie", "livemount_session=abcd"),
                ("x-livemount-csrf", &csrf),
                ("origin", &own),
            ],
            401,
        ),
    ];
    for (what, headers, status) in &refused {
        let r = h.call("POST", "/v1/mounts", headers, Some(&mount));
        assert_eq!(r.status, *status, "{what}: {}", r.body);
        assert!(r.body["error"].is_string(), "{what}: {}", r.body);
        let r = h.call("DELETE", "/v1/profiles/vm", headers, None);
        assert_eq!(r.status, *status, "{what}: {}", r.body);
        let r = h.call("DELETE", "/v1/session", headers, None);
        assert_eq!(r.status, *status, "{what}: {}", r.body);
    }
    assert_eq!(mounts(), 0);
    assert!(server.cli(&["profile", "list"]).contains("vm"));

    // The page's own request goes through (Origin as a browser sends it; ureq sends Host).
    let ok = [
        ("cookie", cookie.as_str()),
        ("x-livemount-csrf", csrf.as_str()),
        ("origin", own.as_str()),
    ];
    let r = h.call("POST", "/v1/mounts", &ok, Some(&mount));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(mounts(), 1);

    // Signed out: the session is stale, and its cookie changes nothing any more.
    let r = h.call("DELETE", "/v1/session", &ok, None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.cookie.unwrap().contains("Max-Age=0"));
    let r = h.call("DELETE", "/v1/mounts/vm-x", &ok, None);
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(
        r.body["error"].as_str().unwrap().contains("sign in again"),
        "{}",
        r.body
    );
    assert_eq!(mounts(), 1);
    assert_eq!(
        h.call("GET", "/v1/mounts", &[("cookie", &cookie)], None)
            .status,
        401
    );

    // The bearer token (the CLI's way) works as before, without CSRF header or Origin.
    let r = h.call(
        "DELETE",
        "/v1/profiles/vm",
        &[("authorization", &bearer)],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = h.call(
        "DELETE",
        "/v1/profiles/vm",
        &[("authorization", &bearer)],
        None,
    );
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(
        r.body["error"]
            .as_str()
            .unwrap()
            .contains("no boot profile for VM"),
        "{}",
        r.body
    );
    let r = h.call(
        "DELETE",
        "/v1/mounts/vm-x",
        &[("authorization", &bearer)],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(mounts(), 0);
    // A wrong bearer token is refused even with a cookie.
    let r = h.call(
        "GET",
        "/v1/mounts",
        &[("authorization", "Bearer nope")],
        None,
    );
    assert_eq!(r.status, 401);

    // The stats: in flight by class, and the history's points.
    let r = h.call("GET", "/v1/stats", &[("authorization", &bearer)], None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["interval_seconds"], 2);
    assert!(r.body["fetches_in_flight"]["vm"].is_u64(), "{}", r.body);
    assert!(r.body["history"].is_array(), "{}", r.body);
    assert!(
        !server.log_text().contains(&token),
        "the token is in the log"
    );
}
