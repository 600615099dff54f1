//! Feeds arbitrary text to the config loader: it must return Ok or Err, never panic, hang or
//! exhaust memory. Every error must render.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match hybridnet_config::load_str(text, std::path::Path::new("fuzz.yaml")) {
        Ok(config) => {
            let _ = config.render(None);
            let _ = config.render_json(None);
        }
        Err(err) => {
            let _ = err.to_string();
        }
    }
});
